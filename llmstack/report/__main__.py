from llmstack.report.cli import main

raise SystemExit(main())
