import sys

from pacs_landmarks.viewer.server import main

sys.exit(main())
