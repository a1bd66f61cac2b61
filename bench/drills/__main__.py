from bench.drills.run import main

raise SystemExit(main())
