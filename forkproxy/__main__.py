from forkproxy.cli import main

main()
