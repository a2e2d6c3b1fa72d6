"""`python -m rora` (and `accelerate launch -m rora recover ...`) run the CLI."""
from .cli import main

if __name__ == "__main__":
    main()
