"""The operations guide cannot rot: every block of docs/operations.md
marked ``sh test`` is run, in order, against a demo space (``sh
test-stopped`` with relay A stopped), after the guide's paths are mapped to
the demo's files."""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import pytest
import trio
from processes import STEP, DemoSpace

pytestmark = pytest.mark.e2e

GUIDE = Path(__file__).parent.parent / "docs" / "operations.md"
BLOCK = re.compile(r"^```sh (test|test-stopped)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks() -> list[tuple[str, str]]:
    return BLOCK.findall(GUIDE.read_text())


def test_the_guide_covers_what_an_administrator_does() -> None:
    headings = re.findall(r"^## (.+)$", GUIDE.read_text(), re.MULTILINE)
    for topic in ("Install", "Enrol", "Configure the local systems", "Start", "Check", "Upgrade",
                  "Renew a certificate", "Back up and restore", "Troubleshooting"):
        assert any(h.startswith(topic) for h in headings), topic
    assert len(blocks()) >= 10


async def test_the_commands_of_the_guide_run(tmp_path: Path) -> None:
    space = DemoSpace(tmp_path / "demo")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        metrics = f"127.0.0.1:{sock.getsockname()[1]}"
    with (space.directory / "relay-a.toml").open("a") as config:
        config.write(f'\n[metrics]\nlisten = "{metrics}"\n')
    (tmp_path / "backups").mkdir()
    names = {
        "/etc/eimis-relay/relay.toml": space.manifest["relays"][0]["config"],
        "/etc/eimis-relay/pki": str(tmp_path / "enrol"),
        "/var/backups/eimis-relay": str(tmp_path / "backups"),
        "127.0.0.1:9108": metrics,
    }
    try:
        await space.start()
        names["MESSAGE_ID"] = await space.a.send("bob@clinique-sud.test", "for the guide")
        await space.a.wait_delivered([names["MESSAGE_ID"]])
        running = True
        for mode, text in blocks():
            if mode == "test-stopped" and running:
                assert space.a.process.terminate() == 0
                running = False
            elif mode == "test" and not running:
                space.a.process.start()
                await space.a.uplink("connected")
                running = True
            for old, new in names.items():
                text = text.replace(old, new)  # noqa: PLW2901 -- the block, made runnable here
            text = re.sub(r"(^|\s)eimis-relay ", rf"\1{sys.executable} -m relay ", text, flags=re.MULTILINE)  # noqa: PLW2901
            with trio.fail_after(STEP * 2):
                result = await trio.run_process(["bash", "-euo", "pipefail", "-c", text], capture_stdout=True,
                                                capture_stderr=True, check=False, cwd=tmp_path)
            assert result.returncode == 0, f"{text}\n{result.stdout.decode()}\n{result.stderr.decode()}"
            assert result.stdout.strip(), text
    finally:
        space.close()
