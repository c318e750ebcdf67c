"""Secrets of the configuration never reach a repr, a log line, an
exception message or what the commands print.

The configuration carries distinctive values (a proxy password, a
webhook signing key, a token and its hash, credentials pasted into URLs);
each place an admin or a log collector may see is searched for them:
repr(config), every log record of a start, a failing uplink, a reload and
a refused reload, `status`, `doctor`, `check-config`, and the problems of
configurations that are wrong in the ways that would echo them."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import replace

import pytest
import trio
from conftest import STEP, Space
from test_reload_atomic import apps  # noqa: F401 (a fixture)

from relay.cli import demo
from relay.cli.main import main
from relay.config.model import load_relay_config
from relay.config.reader import ConfigError

PROXY_PASSWORD = "Proxy-Pa55-7f3a9e"
WEBHOOK_KEY = "Webhook-Key-91c2d4e5f6"
TOKEN = "Bearer-Token-5e8d0b1a2c3d"
TOKEN_HASH = hashlib.sha256(TOKEN.encode()).hexdigest()
HUB_PASSWORD = "Hub-Url-Pa55-33aa"
HOOK_PASSWORD = "Hook-Url-Pa55-44bb"
SECRETS = (PROXY_PASSWORD, WEBHOOK_KEY, TOKEN, TOKEN_HASH, HUB_PASSWORD, HOOK_PASSWORD)


def assert_no_secret(text: str, where: str) -> None:
    found = [secret for secret in SECRETS if secret in text or secret.lower() in text.lower()]
    assert not found, f"{found} in {where}:\n{text[-2000:]}"


def _secret_config(path, proxy_port: int) -> None:
    """Relay A's file with a proxy with a password, a webhook with its key,
    and a system whose token is TOKEN."""
    key = path.parent / "hook.secret"
    key.write_text(WEBHOOK_KEY + "\n")
    key.chmod(0o600)
    text = path.read_text()
    text = re.sub(r'(hub_url = "[^"]*")', rf'\1\nproxy = "http://relay:{PROXY_PASSWORD}@127.0.0.1:{proxy_port}"',
                  text)
    path.write_text(text + f'\n[[local_system]]\nname = "lab"\ntoken_sha256 = "{TOKEN_HASH}"\n'
                           f'users = ["lab@chu-nord.test"]\nwebhook_url = "http://127.0.0.1:9/hook"\n'
                           f'webhook_secret_file = "hook.secret"\n')


def test_repr_and_str_of_the_config_hold_no_secret(tmp_path) -> None:
    path = demo.init(tmp_path)["relays"][0]["config"]
    _secret_config(tmp_path / "relay-a.toml", 9)
    config = load_relay_config(path)
    assert config.uplink.proxy.password.reveal() == PROXY_PASSWORD  # they are there, and kept out of sight
    assert config.local_systems[-1].webhook_secret.reveal() == WEBHOOK_KEY.encode()
    for shown in (repr(config), str(config), f"{config}", repr(config.uplink.proxy), str(config.local_systems),
                  f"{config.uplink.proxy.password}"):
        assert_no_secret(shown, "repr(config)")


@pytest.mark.parametrize(("line", "value"), [
    ("hub_url", f"https://relay:{HUB_PASSWORD}@hub.eimis.test"),
    ("proxy", f"http://relay:{PROXY_PASSWORD}@proxy.example"),  # no port
    ("proxy", f"ftp://relay:{PROXY_PASSWORD}@proxy.example:3128"),
    ("webhook_url", f"https://hooks:{HOOK_PASSWORD}@hooks.example/eimis"),
    ("token_sha256", TOKEN),  # the token pasted in place of its hash
])
def test_config_problems_never_repeat_a_secret(tmp_path, capsys, line, value) -> None:
    path = tmp_path / "relay-a.toml"
    demo.init(tmp_path)
    text = path.read_text()
    if line in ("hub_url", "proxy"):
        text = re.sub(r'hub_url = "[^"]*"', f'hub_url = "https://hub.eimis.test"\n{line} = "{value}"'
                      if line == "proxy" else f'hub_url = "{value}"', text)
    else:
        token_sha256 = value if line == "token_sha256" else TOKEN_HASH
        text += (f'\n[[local_system]]\nname = "lab"\ntoken_sha256 = "{token_sha256}"\nusers = ["lab@chu-nord.test"]\n'
                 + (f'webhook_url = "{value}"\n' if line == "webhook_url" else ""))
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_relay_config(path)
    assert f"{line}:" in str(refused.value)  # the problem is reported, without the value
    assert_no_secret(str(refused.value) + repr(refused.value), "the ConfigError")
    assert main(["check-config", "--config", str(path)]) == 1
    assert_no_secret(capsys.readouterr().out, "check-config")


async def test_logs_status_doctor_and_check_config_hold_no_secret(stopped_space: Space, apps, caplog,  # noqa: F811
                                                                  capsys) -> None:
    """A start whose uplink fails through the proxy (nothing listens on its
    port), a reload applied, a reload refused: no record carries a secret,
    nor does what the commands print."""
    space = stopped_space
    caplog.set_level(logging.DEBUG)
    path = space.a.config.path
    await space.start_hub()
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))  # a port nobody listens on: the proxy is down
    proxy_port = closed.getsockname()[1]
    _secret_config(path, proxy_port)
    hub_url = space.a.config.uplink.hub_url
    path.write_text(re.sub(r'hub_url = "[^"]*"', f'hub_url = "{hub_url}"', path.read_text()))
    space.a.config = replace(load_relay_config(path), state_dir=space.a.config.state_dir)
    await space.start_relay(space.a, wait_connected=False)
    (app,) = apps
    with trio.fail_after(STEP):
        while app.uplink.last_error is None:  # the proxy refused the connection: logged
            await trio.sleep(0.02)
    with trio.fail_after(STEP):
        assert await app.reloader.reload("test") is True
    path.write_text(path.read_text().replace(f'token_sha256 = "{TOKEN_HASH}"', f'token_sha256 = "{TOKEN}"'))
    with trio.fail_after(STEP):
        assert await app.reloader.reload("test") is False
    status = await space.daemon_status(space.a)
    closed.close()

    assert str(proxy_port) in app.uplink.last_error  # the way to the hub went through the proxy
    assert any("reload refused" in r.getMessage() for r in caplog.records)
    assert_no_secret("\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records), "the logs")
    assert_no_secret(repr(status), "status")
    capsys.readouterr()
    path.write_text(path.read_text().replace(f'token_sha256 = "{TOKEN}"', f'token_sha256 = "{TOKEN_HASH}"'))
    assert main(["check-config", "--config", str(path)]) == 0
    await trio.to_thread.run_sync(main, ["doctor", "--config", str(path)])
    assert_no_secret(capsys.readouterr().out, "check-config and doctor")
