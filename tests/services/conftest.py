"""Session-scoped fixtures that start real services (sshd, an S3 server, dockerd...) on 127.0.0.1.

Each service lives in its own `svc_*.py` module beside this file; every public name of those
modules (its fixtures) is made available to the tests in this folder.
"""

import importlib
from pathlib import Path

for _path in sorted(Path(__file__).parent.glob("svc_*.py")):
    _module = importlib.import_module(f"{__package__}.{_path.stem}")
    globals().update({k: v for k, v in vars(_module).items() if not k.startswith("_")})
