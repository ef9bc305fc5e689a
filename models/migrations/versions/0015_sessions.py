"""sessions: login sessions (auth_session) and their rotating refresh tokens (auth_refresh)

Revision ID: 0015
Revises: 0019
"""
from alembic import op
import sqlalchemy as sa


revision = '0015'
down_revision = '0019'
branch_labels = None
depends_on = None

TABLE_ARGS = dict(mysql_engine='InnoDB', mysql_charset='utf8mb4', mysql_collate='utf8mb4_unicode_ci')


def upgrade() -> None:
    op.create_table(
        'auth_session',
        sa.Column('id', sa.String(32), nullable=False),
        sa.Column('user_id', sa.BigInteger(), nullable=False),
        sa.Column('created_at_ms', sa.BigInteger(), nullable=False),
        sa.Column('last_used_at_ms', sa.BigInteger(), nullable=False),
        sa.Column('revoked_at_ms', sa.BigInteger(), nullable=True),
        sa.Column('revoked_reason', sa.String(32), nullable=True),
        sa.Column('user_agent', sa.String(255), nullable=True),
        sa.Column('ip', sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_auth_session')),
        **TABLE_ARGS,
    )
    op.create_index('idx_auth_session_user', 'auth_session', ['user_id'])
    op.create_table(
        'auth_refresh',
        sa.Column('token_hash', sa.String(64), nullable=False),
        sa.Column('session_id', sa.String(32), nullable=False),
        sa.Column('created_at_ms', sa.BigInteger(), nullable=False),
        sa.Column('expires_at_ms', sa.BigInteger(), nullable=False),
        sa.Column('used_at_ms', sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint('token_hash', name=op.f('pk_auth_refresh')),
        **TABLE_ARGS,
    )
    op.create_index('idx_auth_refresh_session', 'auth_refresh', ['session_id'])


def downgrade() -> None:
    op.drop_index('idx_auth_refresh_session', table_name='auth_refresh')
    op.drop_table('auth_refresh')
    op.drop_index('idx_auth_session_user', table_name='auth_session')
    op.drop_table('auth_session')
