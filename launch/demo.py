"""CPU demo of CLoRA training on locally built tiny assets: `python launch/demo.py --help`."""
from clora_ds.demo import main

if __name__ == "__main__":
    main()
