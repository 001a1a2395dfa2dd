from iar2.cli import main

raise SystemExit(main())
