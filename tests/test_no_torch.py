"""The runtime never imports torch: render in a process where importing torch, diffusers or transformers fails."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import sys
for name in ("torch", "diffusers", "transformers", "optimum"):
    sys.modules[name] = None  # makes `import name` raise ImportError
import edgediff, edgediff.runtime
from edgediff import Pipeline
out = Pipeline.load(sys.argv[1])("a red cat", num_inference_steps=2, height=32, width=32, output_type="np")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers") and sys.modules[m])
import json
print(json.dumps({"shape": list(out.images.shape), "heavy": loaded}))
"""


def test_render_without_torch(bundle):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(bundle("sd1"))], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"shape": [1, 32, 32, 3], "heavy": []}
