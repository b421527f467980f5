from chat.cli import main

main()
