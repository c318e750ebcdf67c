"""The local API and the metrics listener on the hospital's network: no
cleartext beyond loopback unless the admin says so by name
(``allow_cleartext_on_network``), and TLS with client certificates from
the local CA that ``eimis-relay pki local-ca`` makes."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio
from conftest import STEP, Space
from test_reload_atomic import apps  # noqa: F401 (a fixture)

from relay.cli import demo, doctor
from relay.cli.main import main
from relay.config.model import MetricsEndpoint, load_relay_config
from relay.config.reader import ConfigError
from relay.config.vocabulary import Address
from relay.runtime.daemon import run_relay

SETTING = "allow_cleartext_on_network"


def _relay_file(where: Space | Path, local_api: str = "", metrics: str = "") -> Path:
    """Relay A's file of a demo space, with its [local_api] listen replaced
    (or commented out) and ``metrics`` as a [metrics] table."""
    path = where.a.config.path if isinstance(where, Space) else Path(demo.init(where)["relays"][0]["config"])
    text = path.read_text().replace('[local_api]\nlisten = "127.0.0.1:', f'[local_api]\n{local_api}#listen = "')
    path.write_text(text + (f"\n[metrics]\n{metrics}" if metrics else ""))
    return path


@pytest.mark.parametrize(("local_api", "metrics", "table"), [
    ('listen = "0.0.0.0:8080"\n', "", "[local_api]"),
    ('listen = "[::]:8080"\n', "", "[local_api]"),
    ('listen = "10.1.2.3:8080"\n', "", "[local_api]"),
    ('listen = "relay.chu-nord.test:8080"\n', "", "[local_api]"),
    ("", 'listen = "0.0.0.0:9108"\n', "[metrics]"),
])
def test_check_config_refuses_cleartext_on_the_network_naming_the_setting(tmp_path: Path, capsys, local_api,
                                                                          metrics, table) -> None:
    path = _relay_file(tmp_path, local_api, metrics)
    assert main(["check-config", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{table}.listen" in out and SETTING in out and "without TLS" in out, out
    with pytest.raises(ConfigError, match=SETTING):
        load_relay_config(path)  # what the daemon's start and every reload read


def test_the_daemon_refuses_to_start_in_cleartext_on_the_network(tmp_path: Path) -> None:
    path = _relay_file(tmp_path, 'listen = "0.0.0.0:0"\n')
    run = subprocess.run([sys.executable, "-m", "relay", "run", "--config", str(path)], capture_output=True,
                         text=True, timeout=STEP, check=False)
    assert run.returncode == os.EX_CONFIG, run.stderr
    assert SETTING in run.stderr and "[local_api].listen" in run.stderr


async def test_run_relay_refuses_a_cleartext_config_built_by_hand(stopped_space: Space) -> None:
    config = stopped_space.a.config
    config = replace(config, metrics=MetricsEndpoint(Address("0.0.0.0", 0)))
    with pytest.raises(ConfigError, match=SETTING), trio.fail_after(STEP):
        await run_relay(config)


async def test_a_reload_to_cleartext_on_the_network_is_refused(stopped_space: Space, apps) -> None:  # noqa: F811
    space = stopped_space
    await space.start_hub()
    await space.start_relay(space.a, wait_connected=False)
    (app,) = apps
    old = app.reloader.config
    _relay_file(space, 'listen = "0.0.0.0:8080"\n')
    with trio.fail_after(STEP):
        assert await app.reloader.reload("test") is False
    assert app.reloader.config is old and app.api.config is old
    assert any(SETTING in problem for problem in app.reloader.last["errors"])


def test_opting_in_is_accepted_and_reported_by_check_config_and_doctor(tmp_path: Path, capsys) -> None:
    path = _relay_file(tmp_path, f'listen = "0.0.0.0:8080"\n{SETTING} = true\n',
                       f'listen = "0.0.0.0:9108"\n{SETTING} = true\n')
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "warning: [local_api] listens on 0.0.0.0:8080 without TLS" in out
    assert "warning: [metrics] listens on 0.0.0.0:9108 without TLS" in out
    checks = doctor.listeners(load_relay_config(path))
    assert [(c.level, c.detail.split(" without")[0]) for c in checks] == [
        ("warning", "[local_api] listens on 0.0.0.0:8080"), ("warning", "[metrics] listens on 0.0.0.0:9108")]


async def test_status_reports_an_opted_in_cleartext_listener(stopped_space: Space) -> None:
    space = stopped_space
    space.a.config = replace(space.a.config, metrics=MetricsEndpoint(Address("0.0.0.0", 0), True))
    await space.start()
    status = await space.daemon_status(space.a)
    assert status["cleartext"] == ["[metrics] 0.0.0.0:0"]
    assert any("[metrics] 0.0.0.0:0 serves HTTP without TLS" in w and SETTING in w for w in status["warnings"])
    assert (await space.daemon_status(space.b))["cleartext"] == []


async def test_local_api_over_tls_with_client_certificates_from_the_pki_commands(stopped_space: Space,
                                                                                 capsys) -> None:
    """What docs/security.md tells an admin to do, done: a local system
    with its certificate gets through (curl and httpx), one without is
    refused at the handshake."""
    space = stopped_space
    local = space.directory / "local-pki"
    assert main(["pki", "local-ca", "--out", str(local), "--server-name", "relay.chu-nord.test",
                 "--ip", "127.0.0.1"]) == 0
    assert main(["pki", "local-client", "--ca-dir", str(local), "--system", "demo-messenger",
                 "--out", str(local / "clients")]) == 0
    assert "key" in capsys.readouterr().out
    ca = local / "local-ca.pem"
    client = (local / "clients" / "demo-messenger.pem", local / "clients" / "demo-messenger.key")
    path = space.a.config.path
    path.write_text(path.read_text().replace("[local_api]\n", "[local_api]\n"
                                             f'tls_cert_file = "{local}/relay.chu-nord.test.pem"\n'
                                             f'tls_key_file = "{local}/relay.chu-nord.test.key"\n'
                                             f'tls_client_ca_file = "{ca}"\n'))
    space.a.config = replace(load_relay_config(path), state_dir=space.a.config.state_dir)
    await space.start_hub()
    await space.start_relay(space.a, wait_connected=False)
    url = space.a.url.replace("http://", "https://") + "/v1/events"
    bearer = f"Authorization: Bearer {space.a.token}"

    def curl(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["curl", "-sS", "--max-time", str(STEP), "--cacert", str(ca), "-H", bearer,
                               "-o", "/dev/null", "-w", "%{http_code}", *extra, url], capture_output=True, text=True,
                              check=False)

    good = await trio.to_thread.run_sync(curl, "--cert", str(client[0]), "--key", str(client[1]))
    assert (good.returncode, good.stdout) == (0, "200"), good.stderr
    refused = await trio.to_thread.run_sync(curl)
    assert refused.returncode != 0 and refused.stdout in ("", "000"), refused
    with_cert = ssl.create_default_context(cafile=ca)
    with_cert.load_cert_chain(*client)
    headers = {"Authorization": f"Bearer {space.a.token}"}
    async with httpx.AsyncClient(verify=with_cert, headers=headers, timeout=STEP) as system:
        assert (await system.get(url)).status_code == 200
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca), headers=headers,
                                 timeout=STEP) as anonymous:
        with pytest.raises(httpx.TransportError):
            await anonymous.get(url)
