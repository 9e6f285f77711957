from repnp.cli import main

raise SystemExit(main())
