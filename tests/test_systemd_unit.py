"""systemd/: the unit passes `systemd-analyze verify`, scores <= 1.5 in
`systemd-analyze security --offline=true`, has the keys the daemon's sd_notify
support relies on, and agrees with the example config, which validates."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from resolverd.config import load_config
from tests.conftest import ROOT

SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "resolverd.service"
EXAMPLE = SYSTEMD / "resolverd.yaml"
SYSUSERS = SYSTEMD / "resolverd.sysusers"
INSTALLED = "/usr/local/bin/resolverd"  # ExecStart='s binary
MAX_EXPOSURE = 1.5
ENV = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"}


def analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (Debian: the systemd package)")
    return path


def unit_keys(text: str) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values, in order (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service() -> dict[str, list[str]]:
    return unit_keys(UNIT.read_text())["Service"]


def one(keys: dict[str, list[str]], key: str) -> str:
    values = keys.get(key, [])
    assert len(values) == 1, f"{key}= given {len(values)} times"
    return values[0]


def usable_copy(tmp_path: Path) -> Path:
    """The unit with its ExecStart binary replaced by a stub that exists, as
    `verify` insists the binary does."""
    stub = tmp_path / "bin" / "resolverd"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    assert INSTALLED in text
    copy = tmp_path / "resolverd.service"
    copy.write_text(text.replace(INSTALLED, str(stub)))
    return copy


# --------------------------------------------------------------------------- systemd-analyze


def test_verify_is_clean(tmp_path: Path) -> None:
    tool = analyze()
    copy = usable_copy(tmp_path)
    out = subprocess.run(
        [tool, "verify", str(copy)], capture_output=True, text=True, env=ENV, timeout=60
    )
    about_unit = [line for line in (out.stdout + out.stderr).splitlines() if "resolverd" in line]
    assert out.returncode == 0 and not about_unit, out.stdout + out.stderr


def test_verify_only_misses_the_binary_as_shipped() -> None:
    """The shipped file itself: nothing wrong but, where resolverd is not
    installed yet, the missing /usr/local/bin/resolverd."""
    tool = analyze()
    out = subprocess.run(
        [tool, "verify", str(UNIT)], capture_output=True, text=True, env=ENV, timeout=60
    )
    other = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if line.strip() and f"Command {INSTALLED} is not executable" not in line
    ]
    assert not other, out.stdout + out.stderr


def test_security_exposure_at_most_1_5(tmp_path: Path) -> None:
    tool = analyze()
    copy = usable_copy(tmp_path)
    out = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    match = re.search(
        r"Overall exposure level for resolverd\.service: (\d+(?:\.\d+)?) (\S+)", out.stdout
    )
    assert match, out.stdout + out.stderr
    exposure = float(match.group(1))
    print(match.group(0))
    assert exposure <= MAX_EXPOSURE, out.stdout
    # Nothing the sandbox could close is left open. What is: the host's
    # network (it serves and forwards DNS), CAP_NET_BIND_SERVICE for port 53,
    # AF_UNIX/AF_INET*, no PrivateUsers= (which would void the capability),
    # the host's root directory, and ProtectClock='s implied char-rtc rule.
    allowed_open = {
        "RootDirectory=/RootImage=",
        "AmbientCapabilities=",
        "CapabilityBoundingSet=~CAP_NET_(BIND_SERVICE|BROADCAST|RAW)",
        "RestrictAddressFamilies=~AF_UNIX",
        "RestrictAddressFamilies=~AF_(INET|INET6)",
        "PrivateNetwork=",
        "PrivateUsers=",
        "IPAddressDeny=",
        "DeviceAllow=",
    }
    failed = {line.split()[1] for line in out.stdout.splitlines() if line.startswith("✗")}
    assert failed <= allowed_open, f"newly exposed: {sorted(failed - allowed_open)}"


def test_sysusers_snippet_parses(tmp_path: Path) -> None:
    tool = shutil.which("systemd-sysusers")
    if tool is None:
        pytest.skip("systemd-sysusers is not installed (Debian: the systemd package)")
    out = subprocess.run(
        [tool, "--dry-run", f"--root={tmp_path}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "Creating user 'resolverd'" in out.stdout + out.stderr


# --------------------------------------------------------------------------- the unit's keys


def test_notify_watchdog_reload_and_stop() -> None:
    keys = service()
    assert one(keys, "Type") == "notify"  # notify-reload needs systemd >= 253
    assert one(keys, "NotifyAccess") == "main"
    assert one(keys, "ExecStart") == f"{INSTALLED} run -c /etc/resolverd/resolverd.yaml"
    assert keys["ExecReload"] == [
        f"{INSTALLED} check-config /etc/resolverd/resolverd.yaml",
        "/bin/kill -HUP $MAINPID",
    ]
    assert re.fullmatch(r"[1-9]\d*s", one(keys, "WatchdogSec"))
    assert one(keys, "Restart") == "on-failure"
    assert one(keys, "RestartPreventExitStatus") == "2"  # config errors: no restart loop
    assert one(keys, "TimeoutStopSec")


def test_port_53_without_root() -> None:
    keys = service()
    assert one(keys, "AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert one(keys, "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert one(keys, "DynamicUser") == "yes"
    assert one(keys, "User") not in ("root", "0", "")
    assert one(keys, "NoNewPrivileges") == "yes"
    # In a user namespace the capability would not cover the host's network.
    assert "PrivateUsers" not in keys


def test_address_families_cover_what_the_daemon_opens() -> None:
    families = one(service(), "RestrictAddressFamilies").split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]


def test_directories_match_the_example_config() -> None:
    keys = service()
    state = Path("/var/lib") / one(keys, "StateDirectory")
    runtime = Path("/run") / one(keys, "RuntimeDirectory")
    configuration = Path("/etc") / one(keys, "ConfigurationDirectory")
    config_file = one(keys, "ExecStart").split(" -c ", 1)[1]
    assert Path(config_file).parent == configuration
    config = load_config(EXAMPLE)
    assert Path(config.registrations.state_file).parent == state
    assert config.snapshot.file is not None and Path(config.snapshot.file).parent == state
    assert config.api.unix_socket is not None and Path(config.api.unix_socket).parent == runtime


# --------------------------------------------------------------------------- the example config


def test_example_config_passes_check_config() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "resolverd", "check-config", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_example_config_is_a_host_setup() -> None:
    config = load_config(EXAMPLE)
    assert config.dns.listen_udp == config.dns.listen_tcp == (("127.0.0.1", 53),)
    assert config.dns.forward.upstreams is None  # /etc/resolv.conf's nameservers
    assert config.api.listen == (("127.0.0.1", 50051),)
    assert config.api.unix_socket == "/run/resolverd/api.sock"
    assert config.api.unix_socket_mode == 0o660
    assert config.api.token is None
    assert config.registrations.state_file == "/var/lib/resolverd/registrations.json"
    assert config.snapshot.file == "/var/lib/resolverd/snapshot.json"
    assert [p.type for p in config.providers] == ["static"]
    assert not config.health_checks_enabled
