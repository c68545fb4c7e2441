-- The demo warehouse schema: stock levels per SKU and location, products, locations.
CREATE TABLE IF NOT EXISTS products (
    sku          text PRIMARY KEY,
    name         text NOT NULL,
    unit_price   numeric(12, 2),
    attributes   jsonb NOT NULL DEFAULT '{}',
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS locations (
    location_code text PRIMARY KEY,
    zone          text NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS stock_levels (
    sku           text NOT NULL REFERENCES products (sku),
    location_code text NOT NULL REFERENCES locations (location_code),
    qty_on_hand   integer NOT NULL,
    qty_reserved  integer NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sku, location_code)
);
