-- A tenant's spending cap per calendar month (UTC), enforced by the gateway; NULL: none.
ALTER TABLE tenants ADD COLUMN budget_usd_month REAL;
