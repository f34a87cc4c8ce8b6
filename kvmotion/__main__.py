from kvmotion.cli.main import main

main()
