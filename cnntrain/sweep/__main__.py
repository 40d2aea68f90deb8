"""A sweep's worker process: ``python -m cnntrain.sweep SWEEP_DIR INDEX`` (started by ``cnntrain sweep``)."""

from __future__ import annotations

import sys

from cnntrain.errors import CnnTrainError
from cnntrain.sweep.worker import worker

if __name__ == "__main__":
    try:
        worker(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    except CnnTrainError as exc:
        print(f"cnntrain sweep: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
