from qwenvl_cli.cli import main

main()
