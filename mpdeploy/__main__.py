import sys

from mpdeploy.cli import main

sys.exit(main())
