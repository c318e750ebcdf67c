import dataclasses
import hashlib
import re
from pathlib import Path

import pytest

from relay.config.model import LocalApi, LocalSystem, load_hub_config, load_relay_config
from relay.config.reader import ConfigError
from relay.config.vocabulary import Address, Proxy

ROOT = Path(__file__).parent.parent


def sha256_hex(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


RELAY = f"""
[relay]
domain = "chu-nord.test"

[uplink]
hub_url = "https://127.0.0.1:8443"
ca_file = "pki/ca.pem"
cert_file = "pki/chu-nord.test.pem"
key_file = "pki/chu-nord.test.key"

[local_api]
listen = "127.0.0.1:0"

[[local_system]]
name = "messenger"
token_sha256 = "{sha256_hex('messenger-token')}"
users = ["*"]

[[local_system]]
name = "lab"
token_sha256 = "{sha256_hex('lab-token')}"
users = ["labo@chu-nord.test", "Urgences@CHU-Nord.test"]
"""

HUB = """
[hub]
name = "hub.eimis.test"
listen = "127.0.0.1:8443"
ca_file = "pki/ca.pem"
cert_file = "pki/hub.pem"
key_file = "pki/hub.key"
"""


def edit(text: str, old: str, new: str) -> str:
    assert old in text, "the test edits a line that is not there"
    return text.replace(old, new, 1)


def write(tmp_path: Path, text: str, name: str = "relay-a.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def relay_problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as error:
        load_relay_config(write(tmp_path, text))
    return error.value.problems


def hub_problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as error:
        load_hub_config(write(tmp_path, text, "hub.toml"))
    return error.value.problems


# Valid files


def test_relay_defaults(tmp_path):
    config = load_relay_config(write(tmp_path, RELAY))

    assert config.path == tmp_path / "relay-a.toml"
    assert config.domain == "chu-nord.test"
    assert config.state_dir is None
    assert config.log_level == "info"
    uplink = config.uplink
    assert (uplink.hub_url, uplink.hub_host, uplink.hub_port) == ("https://127.0.0.1:8443", "127.0.0.1", 8443)
    assert uplink.server_name == "127.0.0.1"
    assert uplink.proxy is None
    assert (uplink.connect_timeout, uplink.keepalive_interval, uplink.keepalive_timeout) == (10.0, 20.0, 10.0)
    assert uplink.request_timeout == 60.0
    assert (uplink.backoff_initial, uplink.backoff_max, uplink.batch_max) == (0.5, 5.0, 500)
    assert config.local_api == LocalApi(listen=Address("127.0.0.1", 0))


def test_relay_every_key(tmp_path):
    text = edit(RELAY, "[relay]\n", '[relay]\nstate_dir = "state-a"\nlog_level = "debug"\n')
    text = edit(
        text,
        'hub_url = "https://127.0.0.1:8443"',
        """hub_url = "https://HUB.eimis.test"
server_name = "hub.eimis.test"
proxy = "http://me:p%40ss@proxy.example:3128"
connect_timeout = 3
keepalive_interval = 1.5
keepalive_timeout = 2
request_timeout = 45
backoff_initial = 1
backoff_max = 1
batch_max = 1""",
    )
    text = edit(
        text,
        'listen = "127.0.0.1:0"',
        """listen = "[::1]:8080"
tls_cert_file = "/etc/eimis/local.pem"
tls_key_file = "local.key"
max_body_bytes = 1000
max_connections = 2""",
    )
    config = load_relay_config(write(tmp_path, text))

    assert config.state_dir == tmp_path / "state-a"
    assert config.log_level == "debug"
    uplink = config.uplink
    assert (uplink.hub_host, uplink.hub_port, uplink.server_name) == ("hub.eimis.test", 443, "hub.eimis.test")
    assert uplink.proxy == Proxy("proxy.example", 3128, "me", "p@ss")
    assert (uplink.connect_timeout, uplink.keepalive_interval, uplink.keepalive_timeout) == (3.0, 1.5, 2.0)
    assert isinstance(uplink.connect_timeout, float)
    assert uplink.request_timeout == 45.0
    assert (uplink.backoff_initial, uplink.backoff_max, uplink.batch_max) == (1.0, 1.0, 1)
    assert config.local_api == LocalApi(
        listen=Address("::1", 8080),
        tls_cert_file=Path("/etc/eimis/local.pem"),
        tls_key_file=tmp_path / "local.key",
        max_body_bytes=1000,
        max_connections=2,
    )


def test_local_systems_are_read(tmp_path):
    messenger, lab = load_relay_config(write(tmp_path, RELAY)).local_systems

    assert messenger.name == "messenger"
    assert messenger.token_sha256 == hashlib.sha256(b"messenger-token").digest()
    assert messenger.all_users
    assert messenger.users == frozenset()
    assert not lab.all_users
    assert lab.users == {"labo@chu-nord.test", "urgences@chu-nord.test"}


def test_local_systems_are_optional(tmp_path):
    text = RELAY[: RELAY.index("[[local_system]]")]

    assert load_relay_config(write(tmp_path, text)).local_systems == ()


def test_config_is_immutable(tmp_path):
    config = load_relay_config(write(tmp_path, RELAY))

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.uplink.batch_max = 1  # type: ignore[misc]
    assert isinstance(config.local_systems, tuple)


def test_relative_paths_are_resolved_from_the_config_directory(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    write(tmp_path / "etc", edit(RELAY, 'ca_file = "pki/ca.pem"', 'ca_file = "/srv/ca.pem"'))
    monkeypatch.chdir(tmp_path)

    config = load_relay_config("etc/relay-a.toml")

    assert config.path == tmp_path / "etc" / "relay-a.toml"
    assert config.uplink.ca_file == Path("/srv/ca.pem")
    assert config.uplink.cert_file == tmp_path / "etc" / "pki" / "chu-nord.test.pem"
    assert config.uplink.key_file == tmp_path / "etc" / "pki" / "chu-nord.test.key"


def test_hub_defaults(tmp_path):
    config = load_hub_config(write(tmp_path, HUB, "hub.toml"))

    assert config.path == tmp_path / "hub.toml"
    assert config.name == "hub.eimis.test"
    assert config.listen == Address("127.0.0.1", 8443)
    assert config.state_dir is None
    assert config.log_level == "info"
    assert (config.ca_file, config.cert_file, config.key_file) == (
        tmp_path / "pki" / "ca.pem",
        tmp_path / "pki" / "hub.pem",
        tmp_path / "pki" / "hub.key",
    )
    assert config.domains == frozenset()
    assert config.learn_domains is False
    limits = (config.keepalive_interval, config.keepalive_timeout, config.max_concurrent_streams)
    assert limits == (20.0, 10.0, 100)
    assert config.expiry_interval == 30.0
    bounds = (config.max_connections, config.max_connections_per_domain, config.max_handshakes,
              config.handshake_timeout)
    assert bounds == (2000, 4, 100, 10.0)
    assert config.replay_window == 30 * 86400
    assert config.metrics.listen is None


def test_hub_every_key(tmp_path):
    text = HUB + """state_dir = "/var/lib/hub"
log_level = "warning"
domains = ["chu-nord.test", "Clinique-Sud.test"]
learn_domains = true
keepalive_interval = 5
keepalive_timeout = 0.5
max_concurrent_streams = 1000
expiry_interval = 0.5
max_connections = 50
max_connections_per_domain = 2
max_handshakes = 8
handshake_timeout = 2.5
replay_window = "60d"

[metrics]
listen = "127.0.0.1:9109"
"""
    config = load_hub_config(write(tmp_path, text, "hub.toml"))

    assert config.state_dir == Path("/var/lib/hub")
    assert config.log_level == "warning"
    assert config.domains == {"chu-nord.test", "clinique-sud.test"}
    assert config.learn_domains is True
    limits = (config.keepalive_interval, config.keepalive_timeout, config.max_concurrent_streams)
    assert limits == (5.0, 0.5, 1000)
    assert config.expiry_interval == 0.5
    bounds = (config.max_connections, config.max_connections_per_domain, config.max_handshakes,
              config.handshake_timeout)
    assert bounds == (50, 2, 8, 2.5)
    assert config.replay_window == 60 * 86400
    assert config.metrics.listen == Address("127.0.0.1", 9109)


@pytest.mark.parametrize(
    ("name", "load"), [("config.example.toml", load_relay_config), ("hub.example.toml", load_hub_config)]
)
def test_examples_load_with_their_optional_settings_on_and_off(tmp_path, name, load):
    text = (ROOT / name).read_text(encoding="utf-8")
    # Optional settings are shown commented out as "#key = value".
    uncommented, count = re.subn(r"^#(?=\w+ = )", "", text, flags=re.MULTILINE)
    assert count > 0

    load(ROOT / name)
    secret = tmp_path / "secrets" / "demo-messenger.webhook"  # what the relay example names
    secret.parent.mkdir()
    secret.write_text("a webhook signing key of some length\n")
    secret.chmod(0o600)
    load(write(tmp_path, uncommented, name))


# Tokens and users


def test_token_matching(tmp_path):
    config = load_relay_config(write(tmp_path, RELAY))
    messenger, lab = config.local_systems

    assert messenger.token_matches("messenger-token")
    assert not messenger.token_matches("lab-token")
    assert not messenger.token_matches("")
    assert config.system_for_token("lab-token") is lab
    assert config.system_for_token("messenger-token") is messenger
    assert config.system_for_token("wrong") is None


def test_all_users_covers_only_the_relay_domain(tmp_path):
    messenger, lab = load_relay_config(write(tmp_path, RELAY)).local_systems

    assert messenger.may_send_as("anyone@chu-nord.test")
    assert messenger.may_send_as("Anyone@CHU-Nord.test")
    assert not messenger.may_send_as("anyone@clinique-sud.test")
    assert not messenger.may_send_as("*")
    assert not messenger.may_send_as("not an address")
    assert lab.may_send_as("labo@chu-nord.test")
    assert lab.may_send_as("URGENCES@chu-nord.test")
    assert not lab.may_send_as("anyone@chu-nord.test")
    assert messenger.serves("anyone@chu-nord.test")
    assert not lab.serves("anyone@chu-nord.test")


def test_all_users_of_a_hand_built_system_without_domain():
    system = LocalSystem("x", bytes(32), frozenset(), all_users=True)

    assert system.may_send_as("anyone@anywhere.test")


def test_systems_serving(tmp_path):
    config = load_relay_config(write(tmp_path, RELAY))
    messenger, lab = config.local_systems

    assert config.systems_serving("labo@chu-nord.test") == (messenger, lab)
    assert config.systems_serving("other@chu-nord.test") == (messenger,)
    assert config.systems_serving("labo@clinique-sud.test") == ()


# Problems


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        (
            'hub_url = "https://127.0.0.1:8443"',
            'hub_url = "ftp://x"',
            "relay-a.toml: [uplink].hub_url: expected an https:// URL, got 'ftp://x'",
        ),
        (
            'hub_url = "https://127.0.0.1:8443"',
            'hub_url = "https://hub.test/path"',
            "relay-a.toml: [uplink].hub_url: expected https://HOST or https://HOST:PORT, got 'https://hub.test/path'",
        ),
        (
            'hub_url = "https://127.0.0.1:8443"',
            'hub_url = "https://127.0.0.1:8443"\nhub_ulr = "x"',
            "relay-a.toml: [uplink].hub_ulr: unknown key",
        ),
        (
            'hub_url = "https://127.0.0.1:8443"',
            'hub_url = "https://127.0.0.1:8443"\nkeepalive_interval = -3',
            "relay-a.toml: [uplink].keepalive_interval: expected seconds > 0, got -3",
        ),
        (
            'hub_url = "https://127.0.0.1:8443"',
            'hub_url = "https://127.0.0.1:8443"\nconnect_timeout = true',
            "relay-a.toml: [uplink].connect_timeout: expected seconds > 0, got True",
        ),
        (
            'hub_url = "https://127.0.0.1:8443"',
            'hub_url = "https://127.0.0.1:8443"\nrequest_timeout = 0',
            "relay-a.toml: [uplink].request_timeout: expected seconds > 0, got 0",
        ),
        (
            'hub_url = "https://127.0.0.1:8443"',
            'hub_url = "https://127.0.0.1:8443"\nbatch_max = 501',
            "relay-a.toml: [uplink].batch_max: expected an integer 1..500, got 501",
        ),
        (
            'hub_url = "https://127.0.0.1:8443"',
            'hub_url = "https://127.0.0.1:8443"\nbackoff_initial = 5\nbackoff_max = 1',
            "relay-a.toml: [uplink].backoff_max: expected seconds >= backoff_initial (5.0), got 1.0",
        ),
        (
            'hub_url = "https://127.0.0.1:8443"',
            'hub_url = "https://127.0.0.1:8443"\nproxy = "https://user:secret@proxy:3128"',
            "relay-a.toml: [uplink].proxy: expected http://HOST:PORT or http://USER:PASSWORD@HOST:PORT",
        ),
        (
            'ca_file = "pki/ca.pem"\n',
            "",
            "relay-a.toml: [uplink].ca_file: missing required key",
        ),
        (
            'ca_file = "pki/ca.pem"',
            'ca_file = ""',
            "relay-a.toml: [uplink].ca_file: expected a path, got ''",
        ),
        (
            'listen = "127.0.0.1:0"',
            'listen = "abc"',
            "relay-a.toml: [local_api].listen: expected HOST:PORT, got 'abc'",
        ),
        (
            'listen = "127.0.0.1:0"',
            'listen = "127.0.0.1:0"\ntls_cert_file = "local.pem"',
            "relay-a.toml: [local_api].tls_key_file: missing, required when tls_cert_file is set",
        ),
        (
            'domain = "chu-nord.test"',
            'domain = "chu-nord.test"\nlog_level = "verbose"',
            "relay-a.toml: [relay].log_level: expected one of debug, info, warning, error, got 'verbose'",
        ),
        (
            'users = ["labo@chu-nord.test", "Urgences@CHU-Nord.test"]',
            'users = ["labo@chu-nord.test", "bob@other.test"]',
            ("relay-a.toml: [local_system][1].users[1]: expected an address at chu-nord.test or \"*\","
             " got 'bob@other.test'"),
        ),
        (
            'users = ["*"]',
            "users = []",
            'relay-a.toml: [local_system][0].users: expected at least one address or "*", got []',
        ),
        (
            'users = ["*"]',
            'users = "*"',
            "relay-a.toml: [local_system][0].users: expected an array, got '*'",
        ),
        (
            f'token_sha256 = "{sha256_hex("lab-token")}"',
            'token_sha256 = "abc"',
            "relay-a.toml: [local_system][1].token_sha256: expected 64 hexadecimal digits "
            "(the SHA-256 hash of the token, never the token), got 3 characters",
        ),
        (
            f'token_sha256 = "{sha256_hex("lab-token")}"',
            f'token_sha256 = "{sha256_hex("messenger-token").upper()}"',
            "relay-a.toml: [local_system][1].token_sha256: same token_sha256 as [local_system][0]",
        ),
        (
            'name = "lab"',
            'name = "messenger"',
            "relay-a.toml: [local_system][1].name: same name as [local_system][0]",
        ),
        (
            'ca_file = "pki/ca.pem"',
            'ca_file = "pki/ca.pem"\nhub_org_ids = ["bad"]',
            "relay-a.toml: [uplink].hub_org_ids[0]: expected an organisation identifier: 1 + FINESS or 3 + SIRET "
            "digits, got 'bad'",
        ),
        (
            "[local_api]",
            "[local_api]\n[local_apis]",
            "relay-a.toml: [local_apis]: unknown table",
        ),
        (
            '[relay]\ndomain = "chu-nord.test"\n',
            "relay = 1\n",
            "relay-a.toml: [relay]: expected a table, got 1",
        ),
    ],
)
def test_relay_problem(tmp_path, old, new, problem):
    assert relay_problems(tmp_path, edit(RELAY, old, new)) == [problem]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('name = "hub"', "hub.toml: [hub].name: expected a DNS name, got 'hub'"),
        ('listen = "::1:8443"', "hub.toml: [hub].listen: expected HOST:PORT, got '::1:8443'"),
        ('listen = "host:65536"', "hub.toml: [hub].listen: expected HOST:PORT, got 'host:65536'"),
        ('domains = ["ok.test", "bad"]', "hub.toml: [hub].domains[1]: expected a DNS name, got 'bad'"),
        ('learn_domains = "yes"', "hub.toml: [hub].learn_domains: expected true or false, got 'yes'"),
        ("max_concurrent_streams = 0", "hub.toml: [hub].max_concurrent_streams: expected an integer 1..1000, got 0"),
        ("keepalive_timeout = inf", "hub.toml: [hub].keepalive_timeout: expected seconds > 0, got inf"),
        ("expiry_interval = 0.01", "hub.toml: [hub].expiry_interval: expected seconds between 0.1 and 3600, got 0.01"),
        ("expiry_interval = 7200", "hub.toml: [hub].expiry_interval: expected seconds between 0.1 and 3600, got 7200"),
        ("max_connections = 0", "hub.toml: [hub].max_connections: expected an integer 1..100000, got 0"),
        ("max_connections_per_domain = 101",
         "hub.toml: [hub].max_connections_per_domain: expected an integer 1..100, got 101"),
        ("max_handshakes = true", "hub.toml: [hub].max_handshakes: expected an integer 1..10000, got True"),
        ("handshake_timeout = 0.1", "hub.toml: [hub].handshake_timeout: expected seconds between 0.5 and 60, got 0.1"),
        ('replay_window = "21d"', "hub.toml: [hub].replay_window: expected a duration of at least 22 days, got '21d'"),
        ("replay_window = -1", "hub.toml: [hub].replay_window: expected a duration > 0 (seconds, or a string like"
                               ' "15m", "12h", "7d"), got -1'),
    ],
)
def test_hub_problem(tmp_path, line, problem):
    key = line.split(" = ")[0]
    text = re.sub(rf"^{key} = .*\n", "", HUB, flags=re.MULTILINE) + line + "\n"

    assert hub_problems(tmp_path, text) == [problem]


def test_every_problem_is_reported_together(tmp_path):
    text = edit(RELAY, 'domain = "chu-nord.test"', 'domain = "chu-nord.test"\ncolour = "blue"')
    text = edit(text, 'hub_url = "https://127.0.0.1:8443"', 'hub_url = "ftp://x"\nbatch_max = 0')
    text = edit(text, 'listen = "127.0.0.1:0"', 'listen = "abc"')
    text = edit(text, 'users = ["*"]', 'users = ["*", "bob@other.test", "bad"]')

    with pytest.raises(ConfigError) as error:
        load_relay_config(write(tmp_path, text))

    assert sorted(error.value.problems) == sorted(
        [
            "relay-a.toml: [uplink].hub_url: expected an https:// URL, got 'ftp://x'",
            "relay-a.toml: [uplink].batch_max: expected an integer 1..500, got 0",
            "relay-a.toml: [local_api].listen: expected HOST:PORT, got 'abc'",
            ("relay-a.toml: [local_system][0].users[1]: expected an address at chu-nord.test or \"*\","
             " got 'bob@other.test'"),
            "relay-a.toml: [local_system][0].users[2]: expected an address at chu-nord.test or \"*\", got 'bad'",
            "relay-a.toml: [relay].colour: unknown key",
        ]
    )
    assert str(error.value) == "\n".join(error.value.problems)


def test_a_missing_table_is_one_problem(tmp_path):
    text = RELAY.replace("[uplink]", "[not_uplink]")

    assert relay_problems(tmp_path, text) == [
        "relay-a.toml: [uplink]: missing required key",
        "relay-a.toml: [not_uplink]: unknown table",
    ]


def test_users_are_checked_even_when_the_domain_is_invalid(tmp_path):
    text = edit(RELAY, 'domain = "chu-nord.test"', 'domain = "nodots"')
    text = edit(text, 'users = ["*"]', 'users = ["not an address"]')

    assert relay_problems(tmp_path, text) == [
        "relay-a.toml: [relay].domain: expected a DNS name, got 'nodots'",
        "relay-a.toml: [local_system][0].users[0]: expected an address or \"*\", got 'not an address'",
    ]


def test_proxy_password_is_not_repeated_in_problems(tmp_path):
    text = edit(
        RELAY,
        'hub_url = "https://127.0.0.1:8443"',
        'hub_url = "https://127.0.0.1:8443"\nproxy = "http://user:secret@proxy"',
    )

    assert "secret" not in "\n".join(relay_problems(tmp_path, text))


def test_toml_syntax_error(tmp_path):
    problems = relay_problems(tmp_path, "[relay]\ndomain = \n")

    assert len(problems) == 1
    assert problems[0].startswith("relay-a.toml: invalid TOML: ")
    assert "line 2" in problems[0]


def test_missing_file(tmp_path):
    path = tmp_path / "relay-a.toml"

    with pytest.raises(ConfigError) as error:
        load_relay_config(path)

    assert error.value.problems == [f"relay-a.toml: cannot read {path}: No such file or directory"]


def test_file_not_utf8(tmp_path):
    path = tmp_path / "hub.toml"
    path.write_bytes(b'[hub]\nname = "\xe9"\n')

    with pytest.raises(ConfigError) as error:
        load_hub_config(path)

    assert error.value.problems == ["hub.toml: not UTF-8 text"]


# Delivery limits, store ceiling and webhooks


def test_durations_and_sizes_take_units(tmp_path):
    text = RELAY.replace("[relay]\n", '[relay]\nmessage_ttl = "2d"\ndelay_warning = 90\nevent_retention = "12h"\n', 1)
    text += '\n[store]\nmax_size = "500MiB"\nhigh_water = 0.5\n'
    config = load_relay_config(write(tmp_path, text))
    assert (config.delivery.message_ttl, config.delivery.delay_warning, config.delivery.event_retention) == (
        2 * 86400, 90.0, 12 * 3600)
    assert (config.store.max_bytes, config.store.high_water) == (500 * 2**20, 0.5)


def test_bad_durations_sizes_and_fractions_are_named(tmp_path):
    text = RELAY.replace("[relay]\n", '[relay]\nmessage_ttl = "soon"\n', 1)
    text += '\n[store]\nmax_size = "lots"\nhigh_water = 1.5\n'
    with pytest.raises(ConfigError) as caught:
        load_relay_config(write(tmp_path, text))
    problems = "\n".join(caught.value.problems)
    assert "[relay].message_ttl: expected a duration > 0" in problems
    assert "[store].max_size: expected a size > 0" in problems
    assert "[store].high_water: expected a fraction > 0 and <= 1, got 1.5" in problems


def _with_webhook(tmp_path, mode: int, content: bytes = b"sixteen-bytes-or-more-secret"):
    secret = tmp_path / "hook.secret"
    secret.write_bytes(content)
    secret.chmod(mode)
    marker = "[[local_system]]\n"
    return RELAY.replace(marker, marker + 'webhook_url = "https://hooks.example/eimis?x=1"\n'
                         'webhook_secret_file = "hook.secret"\n', 1)


def test_webhook_secret_is_read_from_a_private_file(tmp_path):
    config = load_relay_config(write(tmp_path, _with_webhook(tmp_path, 0o600)))
    system = config.local_systems[0]
    assert system.webhook_url == "https://hooks.example/eimis?x=1"
    assert system.webhook_secret.reveal() == b"sixteen-bytes-or-more-secret"
    assert "sixteen" not in repr(system)


def test_webhook_secret_readable_by_others_is_refused(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_relay_config(write(tmp_path, _with_webhook(tmp_path, 0o644)))
    [problem] = caught.value.problems
    assert "[local_system][0].webhook_secret_file" in problem and "chmod 600" in problem


def test_webhook_url_needs_a_secret(tmp_path):
    text = RELAY.replace("[[local_system]]\n", '[[local_system]]\nwebhook_url = "http://127.0.0.1:9/x"\n', 1)
    with pytest.raises(ConfigError) as caught:
        load_relay_config(write(tmp_path, text))
    assert caught.value.problems == [
        "relay-a.toml: [local_system][0].webhook_secret_file: missing, required when webhook_url is set"]
