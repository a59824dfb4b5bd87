import sys

from automodel.cli.main import main

sys.exit(main())
