from maxmatch_cli.cli import main

main()
