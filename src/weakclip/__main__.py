import sys

from weakclip.cli import main

sys.exit(main())
