"""`python -m videogen_client`: the `videogen` command."""

import sys

from videogen_client.cli import main

sys.exit(main())
