from cnntrain.cli import main

raise SystemExit(main())
