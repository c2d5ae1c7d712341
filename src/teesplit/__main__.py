import sys

from teesplit.cli import main

sys.exit(main())
