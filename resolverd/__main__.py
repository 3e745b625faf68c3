from resolverd.cli import main

raise SystemExit(main())
