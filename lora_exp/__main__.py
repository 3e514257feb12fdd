from lora_exp.cli import main

main()
