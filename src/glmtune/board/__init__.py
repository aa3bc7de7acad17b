"""glmtune board: the whole job in a web page (Gradio). Every action runs, or shows, the same `glmtune ...` command a
script would; training runs as that command in its own process, so the page can close or fail without touching it.

Layout: app.py puts the pages together; page_*.py is one tab each; the logic they call lives in plain modules that
need no browser: command_line.py (the commands), runs.py (starting, stopping and listing runs), progress.py (what a
run's log and files say), dataset_report.py, demo_model.py, i18n.py (the labels in English and Chinese).
"""
