from fedff.cli import main

raise SystemExit(main())
