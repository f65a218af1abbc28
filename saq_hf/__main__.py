"""``python -m saq_hf`` is the ``saq-hf`` command."""

import sys

from .cli import main

sys.exit(main())
