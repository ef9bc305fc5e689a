"""account safety: blocks (user_block), presence privacy (user.presence_visibility), account
deletion (user.deleted_at, username_reservation), who recalled a message (message.recalled_by),
the audit log (audit_log) and digest email verification (push_setting.email_*)

Revision ID: 0014
Revises: 0008
"""
from alembic import op
import sqlalchemy as sa


revision = '0014'
down_revision = '0008'
branch_labels = None
depends_on = None

TABLE_ARGS = dict(mysql_engine='InnoDB', mysql_charset='utf8mb4', mysql_collate='utf8mb4_unicode_ci')
AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deleted_at', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('presence_visibility', sa.String(16), server_default='everyone',
                                      nullable=False))
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('recalled_by', sa.String(16), nullable=True))
    with op.batch_alter_table('push_setting', schema=None) as batch_op:
        batch_op.add_column(sa.Column('email_verified_at', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('email_code_hash', sa.String(64), nullable=True))
        batch_op.add_column(sa.Column('email_code_expires_at', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('email_code_attempts', sa.Integer(), server_default='0', nullable=False))
    op.create_table(
        'user_block',
        sa.Column('blocker_id', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('blocked_id', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('created_at_ms', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('blocker_id', 'blocked_id', name=op.f('pk_user_block')),
        **TABLE_ARGS,
    )
    op.create_index('idx_block_blocked', 'user_block', ['blocked_id'])
    op.create_table(
        'username_reservation',
        sa.Column('username', sa.String(64), nullable=False),
        sa.Column('user_id', sa.BigInteger(), nullable=False),
        sa.Column('until_ms', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('username', name=op.f('pk_username_reservation')),
        **TABLE_ARGS,
    )
    op.create_table(
        'audit_log',
        sa.Column('id', AUTO_ID, autoincrement=True, nullable=False),
        sa.Column('at_ms', sa.BigInteger(), nullable=False),
        sa.Column('actor_id', sa.BigInteger(), nullable=True),
        sa.Column('actor', sa.String(16), nullable=False),
        sa.Column('action', sa.String(64), nullable=False),
        sa.Column('target_type', sa.String(32), nullable=False),
        sa.Column('target_id', sa.String(64), nullable=False),
        sa.Column('detail', sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log')),
        **TABLE_ARGS,
    )
    op.create_index('idx_audit_at', 'audit_log', ['at_ms'])


def downgrade() -> None:
    op.drop_index('idx_audit_at', table_name='audit_log')
    op.drop_table('audit_log')
    op.drop_table('username_reservation')
    op.drop_index('idx_block_blocked', table_name='user_block')
    op.drop_table('user_block')
    with op.batch_alter_table('push_setting', schema=None) as batch_op:
        for column in ('email_code_attempts', 'email_code_expires_at', 'email_code_hash', 'email_verified_at'):
            batch_op.drop_column(column)
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_column('recalled_by')
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.drop_column('presence_visibility')
        batch_op.drop_column('deleted_at')
