"""Log output is JSON lines only: Python warnings, transformers' and huggingface_hub's loggers and
their progress bars all go through (or away from) the one root handler."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import logging, warnings
from server.logs import configure_logging
configure_logging("info", json_lines={json_lines})
for _ in range(3):  # the same warning on every request is logged once
    warnings.warn("`past_key_values` is deprecated", FutureWarning, stacklevel=1)
warnings.warn("another one", UserWarning, stacklevel=1)
from transformers.utils import logging as tl
tl.get_logger("transformers.modeling_utils").warning("a transformers warning")
for _ in tl.tqdm(range(3), desc="Writing model shards"):
    pass
from huggingface_hub.utils import logging as hl, tqdm as hub_tqdm
hl.get_logger("huggingface_hub.file_download").warning("a hub warning")
for _ in hub_tqdm(range(3), desc="Fetching files"):
    pass
logging.getLogger("server.test").info("done")
"""


def _run(json_lines: bool) -> list[str]:
    result = subprocess.run([sys.executable, "-c", SCRIPT.format(json_lines=json_lines)], capture_output=True,
                            text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_everything_is_one_json_line_each():
    entries = [json.loads(line) for line in _run(True)]  # a bar or a raw warning would not parse
    messages = [(e["logger"], e["level"], e["msg"]) for e in entries]
    assert [m for m in messages if "past_key_values" in m[2]] == [
        ("py.warnings", "warning", messages[0][2])]
    assert messages[0][2].startswith("FutureWarning: `past_key_values` is deprecated (")
    assert ("transformers.modeling_utils", "warning", "a transformers warning") in messages
    assert ("huggingface_hub.file_download", "warning", "a hub warning") in messages
    assert any(m[0] == "py.warnings" and m[2].startswith("UserWarning: another one") for m in messages)
    assert messages[-1] == ("server.test", "info", "done")
    assert len(messages) == 5


def test_plain_text_when_asked():
    lines = _run(False)
    assert len(lines) == 5 and not any(line.startswith("{") for line in lines)
    assert lines[-1].endswith("INFO server.test: done")
    assert not any("Writing model shards" in line or "Fetching files" in line for line in lines)
