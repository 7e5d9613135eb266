from __future__ import annotations

from llmstack.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
