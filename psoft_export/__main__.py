from psoft_export.cli import main

main()
