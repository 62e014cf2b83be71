"""`python train.py [group=choice ...] [key=value ...]` -- see configs/train.yaml and the README."""

from lightning_peft.app import main

if __name__ == "__main__":
    main()
