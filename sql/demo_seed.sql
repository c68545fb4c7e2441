-- Seed data for a demo warehouse (after sql/demo_schema.sql): 500 products, 20 locations and
-- a stock level for every pair (10,000 rows), plus the publication InventorySync streams.
-- psql variable `wh` (e.g. -v wh=1) varies the quantities between warehouses.
INSERT INTO products (sku, name, unit_price)
SELECT 'SKU-' || g, 'product ' || g, round((g * 1.37)::numeric % 90 + 1, 2)
  FROM generate_series(1, 500) g;
INSERT INTO locations (location_code, zone)
SELECT 'L-' || lpad(g::text, 2, '0'), 'zone ' || (g % 4)
  FROM generate_series(1, 20) g;
INSERT INTO stock_levels (sku, location_code, qty_on_hand, qty_reserved)
SELECT 'SKU-' || p, 'L-' || lpad(l::text, 2, '0'), (p * l * :wh) % 97 + 10, (p + l) % 5
  FROM generate_series(1, 500) p, generate_series(1, 20) l;
CREATE PUBLICATION inventorysync FOR TABLE products, locations, stock_levels;
