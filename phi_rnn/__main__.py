from phi_rnn.cli import main

raise SystemExit(main())
