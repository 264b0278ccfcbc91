"""Compare the two 300-step runs of run.sh: exported weights byte for byte, config, training scalars."""
import json, sys
from pathlib import Path
sys.path.insert(0, ".")
from tests.distributed import scalars
b, a = Path("runs/bitwise/before"), Path("runs/bitwise/after")
same_weights = (b / "model/model.safetensors").read_bytes() == (a / "model/model.safetensors").read_bytes()
cb, ca = json.loads((b / "model/config.json").read_text()), json.loads((a / "model/config.json").read_text())
diff = {k: (cb.get(k), ca.get(k)) for k in set(cb) | set(ca) if cb.get(k) != ca.get(k)}
sb, sa = scalars(b / "tensorboard"), scalars(a / "tensorboard")
tags = sorted(t for t in sb if not t.startswith("perf/") and not t.startswith("mem/"))
differing = [t for t in tags if sb[t] != sa.get(t)]
print(json.dumps({"model.safetensors byte-identical": same_weights, "config.json differences": diff,
                  "training scalars compared": len(tags), "scalars differing": differing,
                  "calibration identical": (b / "model/calibration.json").read_text() == (a / "model/calibration.json").read_text()}, indent=1))
