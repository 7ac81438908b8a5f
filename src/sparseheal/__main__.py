"""``python -m sparseheal``."""

from sparseheal.cli import main

if __name__ == "__main__":
    main()
