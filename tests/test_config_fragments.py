"""Fragments: X.toml plus X.d/*.toml, as the Debian package lays them out.

The package ships /etc/eimis-relay/relay.toml with comments only and never
changes it; the admin's settings go in relay.d/. These tests pin the merge
rules and that every problem still names the file the key came from.
"""

import hashlib
from pathlib import Path

import pytest

from relay.config.model import load_hub_config, load_relay_config
from relay.config.reader import ConfigError, NotConfigured, defines_table

ROOT = Path(__file__).parent.parent


def sha256_hex(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


RELAY_TABLE = """
[relay]
domain = "chu-nord.test"
"""

UPLINK_TABLE = """
[uplink]
hub_url = "https://127.0.0.1:8443"
ca_file = "pki/ca.pem"
cert_file = "pki/chu-nord.test.pem"
key_file = "pki/chu-nord.test.key"
"""

MESSENGER = f"""
[[local_system]]
name = "messenger"
token_sha256 = "{sha256_hex('messenger-token')}"
users = ["*"]
"""

LAB = f"""
[[local_system]]
name = "lab"
token_sha256 = "{sha256_hex('lab-token')}"
users = ["labo@chu-nord.test"]
"""

HEADER = "# Settings go in relay.d/*.toml.\n"


def lay_out(directory: Path, main: str, fragments: dict[str, str], name: str = "relay") -> Path:
    """Write NAME.toml and NAME.d/<fragment>; return the main file's path."""
    path = directory / f"{name}.toml"
    path.write_text(main, encoding="utf-8")
    if fragments:
        (directory / f"{name}.d").mkdir()
    for fragment, text in fragments.items():
        (directory / f"{name}.d" / fragment).write_text(text, encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as error:
        load_relay_config(path)
    return error.value.problems


def test_settings_only_in_fragments(tmp_path):
    path = lay_out(tmp_path, HEADER, {"10-relay.toml": RELAY_TABLE, "20-uplink.toml": UPLINK_TABLE + MESSENGER})

    config = load_relay_config(path)

    assert config.path == path
    assert config.domain == "chu-nord.test"
    assert [system.name for system in config.local_systems] == ["messenger"]


def test_fragments_are_read_in_sorted_order_and_later_scalars_win(tmp_path):
    path = lay_out(tmp_path, RELAY_TABLE + 'log_level = "warning"\n' + UPLINK_TABLE, {
        "20-debug.toml": '[relay]\nlog_level = "debug"\n',
        "10-error.toml": '[relay]\nlog_level = "error"\n',
    })

    assert load_relay_config(path).log_level == "debug"


def test_tables_merge_key_by_key(tmp_path):
    path = lay_out(tmp_path, RELAY_TABLE + UPLINK_TABLE, {
        "50-proxy.toml": '[uplink]\nproxy = "http://proxy.chu-nord.test:3128"\nconnect_timeout = 3\n',
    })

    uplink = load_relay_config(path).uplink

    assert uplink.hub_url == "https://127.0.0.1:8443"  # from relay.toml
    assert (uplink.proxy.host, uplink.connect_timeout) == ("proxy.chu-nord.test", 3.0)  # from the fragment


def test_a_later_array_replaces_an_earlier_one(tmp_path):
    hub = """[hub]
name = "hub.eimis.test"
listen = "127.0.0.1:8443"
ca_file = "ca.pem"
cert_file = "hub.pem"
key_file = "hub.key"
domains = ["a.test", "b.test"]
"""
    path = lay_out(tmp_path, hub, {"x.toml": '[hub]\ndomains = ["c.test"]\n'}, name="hub")

    assert load_hub_config(path).domains == {"c.test"}


def test_arrays_of_tables_are_put_end_to_end(tmp_path):
    path = lay_out(tmp_path, RELAY_TABLE + UPLINK_TABLE + MESSENGER, {"lab.toml": LAB})

    assert [system.name for system in load_relay_config(path).local_systems] == ["messenger", "lab"]


def test_relative_paths_are_relative_to_the_fragment(tmp_path):
    path = lay_out(tmp_path, RELAY_TABLE, {"site.toml": UPLINK_TABLE + '[relay]\nstate_dir = "state"\n'})

    config = load_relay_config(path)

    assert config.uplink.ca_file == tmp_path / "relay.d" / "pki" / "ca.pem"
    assert config.state_dir == tmp_path / "relay.d" / "state"


def test_a_problem_names_the_fragment_the_key_came_from(tmp_path):
    path = lay_out(tmp_path, RELAY_TABLE + UPLINK_TABLE, {
        "10-site.toml": '[uplink]\nkeepalive_interval = -3\n',
        "20-site.toml": '[relay]\nlog_levle = "debug"\n',
    })

    assert problems(path) == [
        "relay.d/10-site.toml: [uplink].keepalive_interval: expected seconds > 0, got -3",
        "relay.d/20-site.toml: [relay].log_levle: unknown key",
    ]


def test_an_override_is_blamed_on_the_file_that_made_it(tmp_path):
    path = lay_out(tmp_path, RELAY_TABLE + UPLINK_TABLE, {"50-x.toml": '[uplink]\nhub_url = "ftp://x"\n'})

    assert problems(path) == ["relay.d/50-x.toml: [uplink].hub_url: expected an https:// URL, got 'ftp://x'"]


def test_a_missing_key_is_blamed_on_the_file_holding_its_table(tmp_path):
    uplink = UPLINK_TABLE.replace('hub_url = "https://127.0.0.1:8443"\n', "")
    path = lay_out(tmp_path, HEADER, {"10-relay.toml": RELAY_TABLE, "20-uplink.toml": uplink})

    assert problems(path) == ["relay.d/20-uplink.toml: [uplink].hub_url: missing required key"]


def test_a_missing_table_is_blamed_on_the_first_file_with_settings(tmp_path):
    path = lay_out(tmp_path, HEADER, {"10-relay.toml": RELAY_TABLE})

    assert problems(path) == ["relay.d/10-relay.toml: [uplink]: missing required key"]


def test_items_of_arrays_of_tables_are_numbered_within_their_file(tmp_path):
    path = lay_out(tmp_path, RELAY_TABLE + UPLINK_TABLE + MESSENGER, {
        "lab.toml": LAB.replace('"lab"', '"messenger"').replace('users = ["labo@chu-nord.test"]', "users = []"),
    })

    assert problems(path) == [
        'relay.d/lab.toml: [local_system][0].users: expected at least one address or "*", got []',
        "relay.d/lab.toml: [local_system][0].name: same name as [local_system][0] in relay.toml",
    ]


def test_only_visible_toml_files_are_fragments(tmp_path):
    path = lay_out(tmp_path, RELAY_TABLE + UPLINK_TABLE, {
        ".hidden.toml": "not toml at all [",
        "notes.txt": "not toml at all [",
        "site.toml.dpkg-old": "not toml at all [",
        "site.toml~": "not toml at all [",
    })
    (tmp_path / "relay.d" / "sub.toml").mkdir()

    assert load_relay_config(path).domain == "chu-nord.test"


def test_every_unreadable_file_is_reported(tmp_path):
    path = lay_out(tmp_path, RELAY_TABLE + UPLINK_TABLE, {"a.toml": "x = [", "b.toml": b"\xff".decode("latin-1")})
    (tmp_path / "relay.d" / "b.toml").write_bytes(b"\xff\xfe")

    found = problems(path)

    assert len(found) == 2
    assert found[0].startswith("relay.d/a.toml: invalid TOML: ")
    assert found[1] == "relay.d/b.toml: not UTF-8 text"


def test_the_main_file_must_exist(tmp_path):
    (tmp_path / "relay.d").mkdir()
    (tmp_path / "relay.d" / "site.toml").write_text(RELAY_TABLE + UPLINK_TABLE)

    assert problems(tmp_path / "relay.toml") == [
        f"relay.toml: cannot read {tmp_path / 'relay.toml'}: No such file or directory"
    ]


@pytest.mark.parametrize("fragments", [{}, {"empty.toml": "# nothing yet\n"}])
def test_no_settings_at_all_says_what_to_do(tmp_path, fragments):
    path = lay_out(tmp_path, HEADER, fragments)

    with pytest.raises(NotConfigured) as error:
        load_relay_config(path)

    (problem,) = error.value.problems
    assert problem.startswith(f"eimis-relay is not configured yet: put your settings in {tmp_path}/relay.d/NAME.toml")
    assert "config.example.toml" in problem
    assert problem.endswith(f"then run: eimis-relay check-config --config {path}")


def test_an_unconfigured_hub_points_at_the_hub_example(tmp_path):
    path = lay_out(tmp_path, HEADER, {}, name="hub")

    with pytest.raises(NotConfigured, match=r"hub\.example\.toml"):
        load_hub_config(path)


def test_hub_settings_in_fragments(tmp_path):
    hub = '[hub]\nname = "hub.eimis.test"\nlisten = "127.0.0.1:8443"\n'
    files = 'ca_file = "pki/ca.pem"\ncert_file = "pki/hub.pem"\nkey_file = "pki/hub.key"\n'
    path = lay_out(tmp_path, HEADER, {"10-hub.toml": hub, "20-files.toml": "[hub]\n" + files}, name="hub")

    assert defines_table(path, "hub")
    assert load_hub_config(path).cert_file == tmp_path / "hub.d" / "pki" / "hub.pem"
    assert not defines_table(path, "relay")
    assert not defines_table(tmp_path / "missing.toml", "hub")


def test_the_shipped_header_and_the_example_as_a_fragment(tmp_path):
    """What an admin does after installing the package: copy the example into relay.d/."""
    header = (ROOT / "packaging" / "etc" / "relay.toml").read_text()
    path = lay_out(tmp_path, header, {})
    with pytest.raises(NotConfigured):
        load_relay_config(path)

    (tmp_path / "relay.d").mkdir()
    (tmp_path / "relay.d" / "site.toml").write_text((ROOT / "config.example.toml").read_text())

    assert load_relay_config(path).domain == "chu-nord.test"


# The Debian package's conffiles. dpkg asks what to do when a conffile the
# admin edited changes in a new version, and unattended-upgrades then skips
# the package, silently: these files must stay as they are, byte for byte.
# Settings belong in code defaults or in relay.d/, never here.
SHIPPED_CONFFILES = {
    "relay.toml": "61a9cd42d769c66cd1666f944a6c0f4a8c3d9ac6d14323e4584a8ce7e440814d",
    "hub.toml": "6dc740ab2f76bed7d1c4efdbbbf5307e9380c80d50b9a23b5e95b09bb4092cd1",
}


@pytest.mark.parametrize("name", sorted(SHIPPED_CONFFILES))
def test_the_shipped_conffiles_never_change(name):
    text = (ROOT / "packaging" / "etc" / name).read_bytes()

    assert hashlib.sha256(text).hexdigest() == SHIPPED_CONFFILES[name]
