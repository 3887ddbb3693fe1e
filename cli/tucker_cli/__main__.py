import sys

from tucker_cli import main

sys.exit(main())
