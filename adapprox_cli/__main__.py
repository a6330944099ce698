from adapprox_cli.cli import main

main()
