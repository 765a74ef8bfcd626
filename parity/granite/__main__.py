import sys

from parity.granite.cli import main

sys.exit(main())
