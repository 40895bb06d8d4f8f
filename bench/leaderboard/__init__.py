"""The leaderboard room: statistics, Pareto ranking, rendering, and the regression gate.

board = build(records, samples)        # bench.leaderboard.build
write(board, out_dir)                  # Markdown, CSV, JSON, HTML, PNG + SVG plot
check(new_records, published_dir)      # exit code of `realign board check`
"""
