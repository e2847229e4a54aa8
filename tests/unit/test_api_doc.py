"""Every Python example of docs/api.md runs (without a daemon: spans stay local)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import ROOT

DOC = (ROOT / "docs" / "api.md").read_text()


def test_api_examples_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOC, re.S)
    assert len(blocks) == 1
    env = dict(os.environ, PYTHONPATH=str(ROOT), RENACER_SOCKET=str(tmp_path / "none.sock"))
    for code in blocks:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout == ("{'experiment.model_name': 'gpt-2', 'experiment.epoch': '0', "
                            "'span.type': 'experiment'}\n")
