"""`python -m winnow.pipelines` is the `winnow` command."""

import sys

from winnow.pipelines.cli import main

sys.exit(main())
