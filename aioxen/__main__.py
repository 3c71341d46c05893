from aioxen.cli import command

command()
