"""What is lost, priced: the pure model (``model``), the accountant that integrates it across
cycles and keeps the totals (``accountant``), and the reports people read (``report``)."""
