from resunet.cli import main

main()
