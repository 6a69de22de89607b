from bequest.cli import main

main()
